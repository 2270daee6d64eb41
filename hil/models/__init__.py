"""Networks: electronic teachers and optical students (frontend physics + digital backend)."""
