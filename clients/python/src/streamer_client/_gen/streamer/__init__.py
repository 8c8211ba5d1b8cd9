"""Generated from proto/streamer/v1 by generate.py. Do not edit."""
