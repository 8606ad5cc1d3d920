"""The wire contract between the pipeline and the RunPod worker: standard library only.

Both sides import these modules, so a change to the schema or to signing is made once and seen by
both. Split by concern:

- :mod:`.errors`: the one error hierarchy (``code``, ``retryable``, a sentence for people);
- :mod:`.signing`: HMAC messages, the verifier with its replay cache;
- :mod:`.schema`: job inputs (the guide's single image, batches), parsing and building, model versions;
- :mod:`.codec`: embeddings as JSON floats or base64 float32.
"""
