"""``heimdex-clip serve``: the search API and page (FastAPI on uvicorn). Imports no torch itself."""
