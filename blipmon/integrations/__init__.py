"""Recording runs of the user's own training scripts: a Hugging Face ``TrainerCallback`` and a Lightning ``Callback``.

Import the one you need — ``blipmon.integrations.transformers`` or ``blipmon.integrations.lightning`` —
so that neither framework is imported for a user of the other. Both write the same profile format as
``blipmon run`` (see ``docs/integrations.md``).
"""
