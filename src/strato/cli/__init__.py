"""Command-line front ends: `strato` and `strato-remote`."""
