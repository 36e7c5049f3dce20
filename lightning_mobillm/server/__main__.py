from lightning_mobillm.server.app import main

if __name__ == "__main__":
    main()
