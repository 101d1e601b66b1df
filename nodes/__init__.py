"""The built-in node library: every module here is scanned for @node functions."""
