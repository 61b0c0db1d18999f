"""The HTTP service: settings, app factory, routes, engine and prompt assembly."""
