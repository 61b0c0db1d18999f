"""HTTP routers; each module holds one part of the API."""
