from polyfuse.cli.main import main

if __name__ == "__main__":  # inference engines may spawn processes that import this module again
    main()
