package xenovia.policy

# A typical request-stage rule set. Every rule reads a few input fields and uses set
# lookups or plain string functions, so its cost stays small next to input parsing.

blocked_tools := {"delete_database", "drop_table", "shell_exec", "transfer_funds"}

allowed_models := {"gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o3-mini"}

allowed_teams := {"support", "sales", "platform"}

max_tokens_cap := 4096

blocked_phrases := ["ignore previous instructions", "reveal your system prompt"]

deny contains sprintf("tool %q is not permitted", [tool]) if {
    some tool in input.tool_names
    tool in blocked_tools
}

deny contains sprintf("model %q is not on the allow-list", [input.model]) if {
    not input.model in allowed_models
}

# Fixed keys of input.request let the gateway send the policy those keys, not the whole body.
requested_limits contains limit if limit := input.request.max_tokens

requested_limits contains limit if limit := input.request.max_completion_tokens

requested_limits contains limit if limit := input.request.max_output_tokens

deny contains sprintf("a token limit of %v exceeds the cap of %v", [limit, max_tokens_cap]) if {
    some limit in requested_limits
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
