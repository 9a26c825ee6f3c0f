"""Memory service: documents with embeddings in PostgreSQL + pgvector (HNSW, cosine)."""
