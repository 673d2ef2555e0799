"""Training objectives: one module per paper, each loss a small callable, each target a pure tensor function."""

# --- EDM + Stable Target Field (issue 3) ---

# --- Sequence-aware (issue 6) ---

# --- Discriminator (issue 4) ---

# --- Score matching (issue 7) ---
