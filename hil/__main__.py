from hil.cli.commands import main

main()
