"""The OpenAI-shaped fine-tuning surface (`/openai/v1`): wire models, names, the mapping onto
the same `JobService` the seed's routes use."""
