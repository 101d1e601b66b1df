"""One module per resource; each ``routes(state)`` returns its APIRouter (prefix /api)."""
