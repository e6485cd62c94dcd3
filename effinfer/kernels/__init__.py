"""Hot code per device. ``dense_linear`` picks its implementation once, at import."""
