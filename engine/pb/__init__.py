"""Generated Protobuf code (`make proto`); do not edit by hand."""
