package xenovia.policy

# Response stage: block an answer in which the model calls the drop_table tool.
deny contains "the model called drop_table" if {
    input.output.tool_calls[_].name == "drop_table"
}
