"""``ddsc`` subcommands for using a trained model: export, impute, generate, embed."""
