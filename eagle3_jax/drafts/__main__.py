"""`python -m eagle3_jax.drafts EXPORT --run-dir RUN --tree K,D,N`: ship a trained draft into the package."""

import sys

from eagle3_jax.drafts import main

if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"drafts: error: {e}")
