"""Ray Serve application builders (``serve_apps.<name>:build_app``) and their Serve config files."""
