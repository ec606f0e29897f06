"""Small subcommands of the maml-stop CLI."""
