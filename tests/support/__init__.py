"""Test support: Hedwig as a child process (proc.py); sinks and DNS join with delivery."""
