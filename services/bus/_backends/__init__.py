"""The bus backends; ``newsmon.bus.open_bus`` picks one by URL."""
