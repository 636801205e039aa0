from mfprune.entry import main

main()
