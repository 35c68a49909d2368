import openai

async def test_smoke(proxy, upstream):
    client = openai.AsyncOpenAI(base_url=proxy.url + "/agents/solver/episodes/e1/v1", api_key="x")
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi there"}])
    print(r)
    s = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi there"}], stream=True)
    async for c in s: print(c)
    print(upstream.received)
    print(await proxy.rows("select * from calls"))
    print(await proxy.rows("select * from episodes"))
