"""The MicroNet Challenge counter, walking the same block args as the model, and its table."""
