from roomshard.cli import main

main()
