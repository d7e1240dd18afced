from cervscan.cli import main

main()
