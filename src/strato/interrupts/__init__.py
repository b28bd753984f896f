"""Interrupt delivery: devices raise interrupts through a Trigger, never through KVM directly."""

from strato.interrupts.trigger import (
    CountingTrigger,
    EventFdTrigger,
    IrqLineTrigger,
    LevelTrigger,
    Trigger,
)

__all__ = ["CountingTrigger", "EventFdTrigger", "IrqLineTrigger", "LevelTrigger", "Trigger"]
