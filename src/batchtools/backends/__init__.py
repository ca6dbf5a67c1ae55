"""Where attempts execute: async, thread, process and subprocess backends."""
