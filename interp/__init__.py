"""Look inside LLM agents: where they refuse, where fine-tuning removes refusal, and where a
forced PING prefix puts it back."""
