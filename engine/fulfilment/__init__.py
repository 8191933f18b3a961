"""The closed loop after an order is published: the status consumer that settles the
Resource Domain's reports, and the reference Resource Domain with its provisioners.
"""
