from hil.entry import main

main()
