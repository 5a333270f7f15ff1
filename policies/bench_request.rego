package xenovia.policy

# A typical request-stage rule set. Every rule reads a few input fields and uses set
# lookups or plain string functions, so its cost stays small next to input parsing.

blocked_tools := {"delete_database", "drop_table", "shell_exec", "transfer_funds"}

allowed_models := {"gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o3-mini"}

allowed_teams := {"support", "sales", "platform"}

max_tokens_cap := 4096

token_limit_fields := ["max_tokens", "max_completion_tokens", "max_output_tokens"]

blocked_phrases := ["ignore previous instructions", "reveal your system prompt"]

deny contains sprintf("tool %q is not permitted", [tool]) if {
    some tool in input.tool_names
    tool in blocked_tools
}

deny contains sprintf("model %q is not on the allow-list", [input.model]) if {
    not input.model in allowed_models
}

deny contains sprintf("%s %v exceeds the cap of %v", [field, limit, max_tokens_cap]) if {
    some field in token_limit_fields
    limit := input.request[field]
    limit > max_tokens_cap
}

# One lower() over the joined user messages is cheaper than one per message.
deny contains "a user message contains a blocked phrase" if {
    user_texts := [m.content | some m in input.messages; m.role == "user"; is_string(m.content)]
    text := lower(concat("\n", user_texts))
    some phrase in blocked_phrases
    contains(text, phrase)
}

# The team property decides who pays, so a request without one is denied too.
deny contains "the team property is missing or not allowed on this proxy" if {
    not input.properties.team in allowed_teams
}
