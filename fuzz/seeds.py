#!/usr/bin/env python3
"""Write the fuzz targets' seed corpus (fuzz/corpus/{delivery,reply}/): real requests and
replies of the wire contract, encoded as a fuzz input is read (amqp_rpc::fuzzing::split): one
byte of flags (bit 0: redelivered), an AMQP 0-9-1 basic content header's property flags and
property list, then the body. Header tables use every field type RabbitMQ's table grammar
has. Python 3 stdlib only; run from anywhere: python3 fuzz/seeds.py"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

def shortstr(s):
    b = s.encode() if isinstance(s, str) else s
    return bytes([len(b)]) + b

def longstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack('>I', len(b)) + b

def value(v):
    kind, x = v
    enc = {
        't': lambda x: b't' + bytes([1 if x else 0]),
        'b': lambda x: b'b' + struct.pack('>b', x),
        'B': lambda x: b'B' + struct.pack('>B', x),
        's': lambda x: b's' + struct.pack('>h', x),
        'u': lambda x: b'u' + struct.pack('>H', x),
        'I': lambda x: b'I' + struct.pack('>i', x),
        'i': lambda x: b'i' + struct.pack('>I', x),
        'l': lambda x: b'l' + struct.pack('>q', x),
        'f': lambda x: b'f' + struct.pack('>f', x),
        'd': lambda x: b'd' + struct.pack('>d', x),
        'D': lambda x: b'D' + struct.pack('>BI', *x),
        'S': lambda x: b'S' + longstr(x),
        'x': lambda x: b'x' + longstr(x),
        'T': lambda x: b'T' + struct.pack('>Q', x),
        'V': lambda x: b'V',
        'A': lambda x: b'A' + longstr(b''.join(value(e) for e in x)),
        'F': lambda x: b'F' + table(x),
    }
    return enc[kind](x)

def table(entries):
    return longstr(b''.join(shortstr(k) + value(v) for k, v in entries))

FIELDS = [  # (name, bit, encoder), in the order of the property list
    ('content_type', 15, shortstr), ('content_encoding', 14, shortstr),
    ('headers', 13, table), ('delivery_mode', 12, lambda x: bytes([x])),
    ('priority', 11, lambda x: bytes([x])), ('correlation_id', 10, shortstr),
    ('reply_to', 9, shortstr), ('expiration', 8, shortstr), ('message_id', 7, shortstr),
    ('timestamp', 6, lambda x: struct.pack('>Q', x)), ('type', 5, shortstr),
    ('user_id', 4, shortstr), ('app_id', 3, shortstr), ('cluster_id', 2, shortstr),
]

def props(**p):
    flags, out = 0, b''
    for name, bit, enc in FIELDS:
        if name in p:
            flags |= 1 << bit
            out += enc(p[name])
    return struct.pack('>H', flags) + out

DIRECT = 'amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAA8DQAAAABrDsDK.2CUud3s79kInSgWszR/mDw=='
FAR = 9999999999999
EVERY_TYPE = [
    ('t', ('t', True)), ('b', ('b', -5)), ('B', ('B', 250)), ('s', ('s', -300)),
    ('u', ('u', 60000)), ('I', ('I', -7)), ('i', ('i', 7)), ('l', ('l', FAR)),
    ('f', ('f', 1.5)), ('d', ('d', 2.5)), ('D', ('D', (2, 12345))), ('S', ('S', 'text')),
    ('x', ('x', b'\x00\xff')), ('T', ('T', 1764572400)), ('V', ('V', None)),
    ('A', ('A', [('I', 1), ('S', 'two'), ('A', [])])), ('F', ('F', [('in', ('t', False))])),
]

DELIVERIES = {
    'tutorial': (0, props(reply_to='amq.gen-JzTY20BRgKO-HjmUJj0wLg', correlation_id='7'), b'30'),
    'ours': (0, props(reply_to=DIRECT, correlation_id='AAAAAQ', type='inline', expiration='5000',
                      headers=[('x-deadline-ms', ('S', str(FAR)))]), b'10'),
    'idempotent': (1, props(reply_to=DIRECT, correlation_id='c', message_id='m-1', type='inline',
                            headers=[('x-deadline-ms', ('l', FAR)), ('x-delivery-count', ('l', 1))]), b'10'),
    'json': (0, props(reply_to=DIRECT, correlation_id='j', type='add', content_type='application/json'),
             b'{"a": 1, "b": 2}'),
    'guarded': (0, props(reply_to=DIRECT, correlation_id='g', type='echo', user_id='alice',
                         app_id='shop'), b'hello'),
    'every_type': (0, props(reply_to=DIRECT, correlation_id='e', type='echo',
                            headers=EVERY_TYPE + [('x-deadline-ms', ('D', (3, 999)))]), b'x'),
    'expired': (0, props(reply_to=DIRECT, correlation_id='x', headers=[('x-deadline-ms', ('I', 1))]), b'1'),
    'forged': (0, props(reply_to='amq.rabbitmq.reply-to.AAAA.BBBB', correlation_id='f'), b'1'),
    'deputy': (0, props(reply_to='billing', correlation_id='d'), b'1'),
    'no_reply_to': (0, props(correlation_id='n'), b'1'),
    'all_fields': (0, props(content_type='text/plain', content_encoding='gzip', headers=[],
                            delivery_mode=2, priority=9, correlation_id='a', reply_to=DIRECT,
                            expiration='1', message_id='id', timestamp=1, type='nosuch',
                            user_id='bob', app_id='app', cluster_id='c'), b'\xff\xfe'),
}

REPLIES = {
    'ok': props(correlation_id='1'), 'other': props(correlation_id='2'), 'none': props(),
    'error': props(correlation_id='1', content_type='text/plain', headers=[
        ('x-error-code', ('S', 'not_found')), ('x-error-retryable', ('t', False))]),
    'unknown_code': props(correlation_id='1', headers=[('x-error-code', ('S', 'bogus'))]),
    'code_of_another_type': props(correlation_id='1', headers=[('x-error-code', ('I', 3))]),
    'every_type': props(correlation_id='1', headers=EVERY_TYPE),
}

def main():
    for name, (flags, p, body) in DELIVERIES.items():
        with open(os.path.join(HERE, 'corpus', 'delivery', name), 'wb') as f:
            f.write(bytes([flags]) + p + body)
    for name, p in REPLIES.items():
        with open(os.path.join(HERE, 'corpus', 'reply', name), 'wb') as f:
            f.write(b'\x00' + p + b'832040')

if __name__ == '__main__':
    main()
