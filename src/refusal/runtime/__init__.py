"""The forward-pass machinery every layer above shares: hooks that always come off, the token roles a
position-scoped edit reads, the shared chat-template prefix, activation extraction, greedy generation
and decoding. It knows models (:mod:`refusal.models`) and nothing about fitting, interventions or runs."""
