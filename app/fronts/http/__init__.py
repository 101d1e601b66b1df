"""The HTTP server: app factory (app), guard (security), settings, state, routes per resource, image metadata."""
