from polyfuse.cli.main import main

main()
