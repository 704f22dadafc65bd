// The official `@anthropic-ai/sdk` Node client, unmodified, on Veil's Messages door.
// tests/test_node_clients.py runs it with VEIL_URL (the server's root) and VEIL_KEY set
// and checks the JSON summary it prints, and what the upstream behind Veil received.
import Anthropic from '@anthropic-ai/sdk';
import { VERSION } from '@anthropic-ai/sdk/version';

const client = new Anthropic({
  baseURL: process.env.VEIL_URL,
  apiKey: process.env.VEIL_KEY,
  maxRetries: 0,
  timeout: 30_000,
});
const MODEL = 'veil';
const WEATHER = {
  name: 'get_weather',
  description: 'The weather in a city.',
  input_schema: {
    type: 'object',
    properties: { city: { type: 'string' } },
    required: ['city'],
  },
};

const user = (content) => ({ role: 'user', content });

/** What a summary keeps of a Message. */
const brief = (message) => ({
  id: message.id,
  type: message.type,
  stop_reason: message.stop_reason,
  content: message.content,
  session_id: message.session_id ?? null,
  usage: { input_tokens: message.usage.input_tokens, output_tokens: message.usage.output_tokens },
});

/** The stream helper: its text events, its final message and the response's session header. */
async function streamed(params) {
  const stream = client.messages.stream(params);
  const texts = [];
  stream.on('text', (delta) => texts.push(delta));
  const { response } = await stream.withResponse();
  const final = await stream.finalMessage();
  return { message: final, texts, header: response.headers.get('x-session-id') };
}

async function failure(promise) {
  try {
    await promise;
    return null;
  } catch (err) {
    return {
      class: err.constructor.name,
      is_api_error: err instanceof Anthropic.APIError,
      status: err.status ?? null,
      type: err.error?.error?.type ?? null,
    };
  }
}

const summary = { sdk: '@anthropic-ai/sdk', version: VERSION };

// One conversation, resent whole each time as Anthropic's clients do and naming no session:
// a whole answer, then one through the stream helper, then a whole one again.
{
  const history = [user('My name is Ann.')];
  const { data: first, response } = await client.messages
    .create({ model: MODEL, max_tokens: 100, messages: history })
    .withResponse();
  history.push({ role: 'assistant', content: first.content }, user('I like tea.'));
  const second = await streamed({ model: MODEL, max_tokens: 100, messages: history });
  history.push({ role: 'assistant', content: second.message.content }, user('What is my name?'));
  const { data: third, response: thirdResponse } = await client.messages
    .create({ model: MODEL, max_tokens: 100, messages: history })
    .withResponse();
  summary.conversation = {
    first: { ...brief(first), header: response.headers.get('x-session-id') },
    second: { ...brief(second.message), texts: second.texts, header: second.header },
    third: { ...brief(third), header: thirdResponse.headers.get('x-session-id') },
  };
}

summary.count_tokens = await client.messages.countTokens({
  model: MODEL,
  system: 'Be brief.',
  messages: [user('How many tokens is this?')],
  tools: [WEATHER],
});

// A client tool, both ways: the model asks for it (tool_use), the script resends the
// history with its tool_result, and the model answers.
summary.tools = {};
for (const mode of ['whole', 'streamed']) {
  const ask = async (messages) => {
    const params = { model: MODEL, max_tokens: 100, tools: [WEATHER], messages };
    if (mode === 'whole') {
      const { data, response } = await client.messages.create(params).withResponse();
      return { ...brief(data), header: response.headers.get('x-session-id') };
    }
    const got = await streamed(params);
    return { ...brief(got.message), header: got.header };
  };
  const history = [user(`Weather in Paris? (${mode})`)];
  const asked = await ask(history);
  const call = asked.content.find((block) => block.type === 'tool_use');
  history.push(
    { role: 'assistant', content: asked.content },
    {
      role: 'user',
      content: [{ type: 'tool_result', tool_use_id: call.id, content: `18 C (${mode})` }],
    },
  );
  summary.tools[mode] = { asked, answered: await ask(history) };
}

// Errors come as the client's own classes.
const wrong = new Anthropic({ baseURL: client.baseURL, apiKey: 'sk-wrong', maxRetries: 0 });
summary.errors = {
  wrong_key: await failure(
    wrong.messages.create({ model: MODEL, max_tokens: 10, messages: [user('hi')] }),
  ),
  unknown_model: await failure(
    client.messages.create({ model: 'no-such-model', max_tokens: 10, messages: [user('hi')] }),
  ),
  unknown_model_streamed: await failure(
    client.messages
      .stream({ model: 'no-such-model', max_tokens: 10, messages: [user('hi')] })
      .finalMessage(),
  ),
  unknown_model_count_tokens: await failure(
    client.messages.countTokens({ model: 'no-such-model', messages: [user('hi')] }),
  ),
};

process.stdout.write(`${JSON.stringify(summary)}\n`);
