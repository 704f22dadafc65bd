"""Server-side tools: run behind the curtain while the client sees a chat."""
