"""Target models behind the (logits, aux, cache) protocol."""
