from n2vdb.cli import main

main()
