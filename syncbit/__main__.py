from syncbit.cli.main import main

main()
