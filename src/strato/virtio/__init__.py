"""virtio: split virtqueues, the device interface, and transports."""
