"""The VMM: configuration, the boot recipe, vCPU threads, the VM state machine."""
