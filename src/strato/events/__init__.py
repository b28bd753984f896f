"""One epoll loop that runs the device data planes."""

from strato.events.loop import EventLoop

__all__ = ["EventLoop"]
