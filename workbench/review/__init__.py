"""Review: app accounts, clinicians' reviews and adjudication, model promotion."""
