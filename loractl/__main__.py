from loractl.cli.app import main

main()
