package xenovia.policy

# Remove email addresses and US social security numbers from every message and
# tool argument (request stage) or from the model's output (response stage).
redact_fields := {"email", "ssn"}
