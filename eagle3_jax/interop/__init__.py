"""Drafts in the peers' layouts: read and write (draft_io), config fields and aux-layer numbering per layout
(formats), the one safetensors reader and atomic writer (files); `python -m eagle3_jax.convert` is the CLI."""

from eagle3_jax.interop.draft_io import EMBED_KEY, READ_LAYOUTS, WRITE_LAYOUTS, DraftCheckpoint, read_draft, write_draft
from eagle3_jax.interop.formats import aux_ids_from_output_numbering, aux_ids_to_output_numbering, default_aux_layer_ids

__all__ = ["EMBED_KEY", "READ_LAYOUTS", "WRITE_LAYOUTS", "DraftCheckpoint", "read_draft", "write_draft",
           "aux_ids_from_output_numbering", "aux_ids_to_output_numbering", "default_aux_layer_ids"]
