"""Emulated devices: legacy x86 platform devices, virtio devices and their host backends.

Devices never import `strato.kvm`: they raise interrupts through a `Trigger` and reach guest
memory through `GuestMemory`, so each one runs in a unit test without KVM.
"""
