"""What a run is asked: the options (options.TrainConfig, frozen, validated), TOML config files
(configfile.py), and what they mean for a world of N processes (plan.py). A new option goes in
options.py; the command line, config files and the API all read it from there."""
