package xenovia.policy

# A typical response-stage rule set, checked once the upstream answer is complete.

blocked_tools := {"delete_database", "drop_table", "shell_exec", "transfer_funds"}

blocked_phrases := ["begin private key", "internal use only"]

deny contains sprintf("the model called the blocked tool %q", [call.name]) if {
    some call in input.output.tool_calls
    call.name in blocked_tools
}

# The gateway passes arguments that are not valid JSON as the raw string.
deny contains sprintf("tool call %q has arguments that are not a JSON object", [call.id]) if {
    some call in input.output.tool_calls
    not is_object(call.arguments)
}

deny contains "tool call arguments may be cut off: the answer hit the token limit" if {
    input.output.finish_reason == "length"
    count(input.output.tool_calls) > 0
}

deny contains "the answer contains a blocked phrase" if {
    is_string(input.output.content)
    text := lower(input.output.content)
    some phrase in blocked_phrases
    contains(text, phrase)
}

# Providers answer with a dated model name, such as gpt-4o-mini-2024-07-18 for gpt-4o-mini.
deny contains sprintf("the answer came from model %q, not %q", [input.output.model, input.model]) if {
    is_string(input.output.model)
    not startswith(input.output.model, input.model)
}
